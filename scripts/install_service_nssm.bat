@echo off
rem Instala o monitor como servico do Windows com o NSSM (https://nssm.cc).
rem Uso (Prompt de Comando como Administrador, na pasta do projeto):
rem   scripts\install_service_nssm.bat [NomeDoServico] [C:\caminho\python.exe]
rem Padrao: servico BemsoftMonitor, python da .venv do projeto ou o primeiro do PATH.
setlocal EnableExtensions
set "SERVICE=%~1"
if "%SERVICE%"=="" set "SERVICE=BemsoftMonitor"
for %%I in ("%~dp0..") do set "ROOT=%%~fI"
set "PY=%~2"
if "%PY%"=="" if exist "%ROOT%\.venv\Scripts\python.exe" set "PY=%ROOT%\.venv\Scripts\python.exe"
if "%PY%"=="" for /f "delims=" %%P in ('where python 2^>nul') do if not defined PY set "PY=%%P"
if "%PY%"=="" (echo Python nao encontrado. Informe o caminho: %~nx0 %SERVICE% C:\caminho\python.exe & exit /b 1)
where nssm >nul 2>nul || (echo NSSM nao encontrado no PATH. Instale o NSSM e tente de novo. & exit /b 1)
if not exist "%ROOT%\.env" (echo Falta o arquivo %ROOT%\.env ^(copie de .env.example^). & exit /b 1)
if not exist "%ROOT%\completo\logs" mkdir "%ROOT%\completo\logs"

nssm install "%SERVICE%" "%PY%" "\"%ROOT%\monitor_bemsoft.py\"" || exit /b 1
nssm set "%SERVICE%" DisplayName "Bemsoft Monitor (SQL -> Bemsoft)"
nssm set "%SERVICE%" Description "Envia os exames terceirizados do sistema legado para a API Bemsoft."
nssm set "%SERVICE%" AppDirectory "%ROOT%"
nssm set "%SERVICE%" AppEnvironmentExtra PYTHONUNBUFFERED=1 PYTHONIOENCODING=utf-8
rem stdout/stderr em arquivos com rotacao (10 MB), alem do LOG_FILE do proprio monitor
nssm set "%SERVICE%" AppStdout "%ROOT%\completo\logs\service.out.log"
nssm set "%SERVICE%" AppStderr "%ROOT%\completo\logs\service.err.log"
nssm set "%SERVICE%" AppRotateFiles 1
nssm set "%SERVICE%" AppRotateOnline 1
nssm set "%SERVICE%" AppRotateBytes 10485760
rem Parada: Ctrl+C no console (o monitor termina a solicitacao em andamento); 120 s de espera
nssm set "%SERVICE%" AppStopMethodSkip 6
nssm set "%SERVICE%" AppStopMethodConsole 120000
rem Reinicia sozinho em caso de falha, exceto erro de configuracao (codigo 2)
nssm set "%SERVICE%" AppExit Default Restart
nssm set "%SERVICE%" AppExit 2 Exit
nssm set "%SERVICE%" AppRestartDelay 10000
nssm set "%SERVICE%" Start SERVICE_AUTO_START
echo.
echo Servico %SERVICE% instalado. Inicie com:  nssm start %SERVICE%
echo Logs: %ROOT%\completo\logs
exit /b 0
